"""Numbers on the wire of the key-server protocol.

The protocol follows the public description of Cloudflare's Keyless SSL
(gokeyless): an 8-byte header ``major u8 | minor u8 | length u16 | id u32``
(big-endian) followed by TLV items ``tag u8 | length u16 | data``. Requests are
padded to :data:`REQUEST_PAD_TO` bytes with a :attr:`Tag.PADDING` item, when one
fits, so that their length says nothing about the SNI or payload. No code was copied: the
numbers below are the published ones, plus keybroker's own error codes at 0x80
and above (marked).
"""

from __future__ import annotations

import enum

VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER_LENGTH = 8
#: A body is at most this long (the length field is 16 bits).
MAX_BODY_LENGTH = 0xFFFF
#: Requests are padded to this many bytes (header included).
REQUEST_PAD_TO = 1024
#: Requests one connection may have outstanding at once.
MAX_PENDING = 1024


class Tag(enum.IntEnum):
    """TLV item tags."""

    RSA_MODULUS_SHA256 = 0x01
    SNI = 0x02
    CLIENT_IP = 0x03
    SKI = 0x04
    SERVER_IP = 0x05
    CERT_ID = 0x06
    OPCODE = 0x11
    PAYLOAD = 0x12
    PADDING = 0x20


class Op(enum.IntEnum):
    """Operation codes (requests) and the three reply codes (OK, PONG, ERROR)."""

    # RSAES-PKCS1-v1_5 decrypt with implicit rejection (a bad padding yields a
    # deterministic pseudo-random message, never an error): keybroker's meaning.
    # gokeyless returns the raw RSA result and lets the edge strip the padding,
    # which makes the key server a padding oracle's engine; we do not.
    RSA_DECRYPT = 0x01
    RSA_SIGN_MD5SHA1 = 0x02
    RSA_SIGN_SHA1 = 0x03
    RSA_SIGN_SHA224 = 0x04
    RSA_SIGN_SHA256 = 0x05
    RSA_SIGN_SHA384 = 0x06
    RSA_SIGN_SHA512 = 0x07
    ECDSA_SIGN_MD5SHA1 = 0x12
    ECDSA_SIGN_SHA1 = 0x13
    ECDSA_SIGN_SHA224 = 0x14
    ECDSA_SIGN_SHA256 = 0x15
    ECDSA_SIGN_SHA384 = 0x16
    ECDSA_SIGN_SHA512 = 0x17
    ED25519_SIGN = 0x18  # over the whole message; every other sign op takes a digest
    RSA_PSS_SIGN_SHA256 = 0x35
    RSA_PSS_SIGN_SHA384 = 0x36
    RSA_PSS_SIGN_SHA512 = 0x37
    RESPONSE = 0xF0  # OK, payload = the result
    PING = 0xF1
    PONG = 0xF2
    ERROR = 0xFF  # payload = one byte, an :class:`ErrorCode`


class ErrorCode(enum.IntEnum):
    """The one-byte payload of an :attr:`Op.ERROR` reply."""

    CRYPTO = 0x01
    KEY_NOT_FOUND = 0x02
    READ = 0x03
    VERSION_MISMATCH = 0x04
    BAD_OPCODE = 0x05
    UNEXPECTED_OPCODE = 0x06
    FORMAT = 0x07
    INTERNAL = 0x08
    # keybroker's own codes
    NOT_AUTHORIZED = 0x80  # key not granted to this edge, or the op not allowed on it
    OVERLOADED = 0x81  # too many requests outstanding on this connection


#: Hash name of each digest-signing opcode (tlslite's spelling; ``md5sha1`` is the
#: TLS 1.0/1.1 concatenation, which keybroker refuses).
SIGN_HASH: dict[Op, str] = {
    Op.RSA_SIGN_MD5SHA1: "md5sha1",
    Op.RSA_SIGN_SHA1: "sha1",
    Op.RSA_SIGN_SHA224: "sha224",
    Op.RSA_SIGN_SHA256: "sha256",
    Op.RSA_SIGN_SHA384: "sha384",
    Op.RSA_SIGN_SHA512: "sha512",
    Op.ECDSA_SIGN_MD5SHA1: "md5sha1",
    Op.ECDSA_SIGN_SHA1: "sha1",
    Op.ECDSA_SIGN_SHA224: "sha224",
    Op.ECDSA_SIGN_SHA256: "sha256",
    Op.ECDSA_SIGN_SHA384: "sha384",
    Op.ECDSA_SIGN_SHA512: "sha512",
    Op.RSA_PSS_SIGN_SHA256: "sha256",
    Op.RSA_PSS_SIGN_SHA384: "sha384",
    Op.RSA_PSS_SIGN_SHA512: "sha512",
}

RSA_PKCS1_OPS = frozenset(
    {
        Op.RSA_SIGN_MD5SHA1,
        Op.RSA_SIGN_SHA1,
        Op.RSA_SIGN_SHA224,
        Op.RSA_SIGN_SHA256,
        Op.RSA_SIGN_SHA384,
        Op.RSA_SIGN_SHA512,
    }
)
RSA_PSS_OPS = frozenset({Op.RSA_PSS_SIGN_SHA256, Op.RSA_PSS_SIGN_SHA384, Op.RSA_PSS_SIGN_SHA512})
ECDSA_OPS = frozenset(
    {
        Op.ECDSA_SIGN_MD5SHA1,
        Op.ECDSA_SIGN_SHA1,
        Op.ECDSA_SIGN_SHA224,
        Op.ECDSA_SIGN_SHA256,
        Op.ECDSA_SIGN_SHA384,
        Op.ECDSA_SIGN_SHA512,
    }
)
#: Every opcode a key server performs on a key.
KEY_OPS = frozenset(RSA_PKCS1_OPS | RSA_PSS_OPS | ECDSA_OPS | {Op.ED25519_SIGN, Op.RSA_DECRYPT})
