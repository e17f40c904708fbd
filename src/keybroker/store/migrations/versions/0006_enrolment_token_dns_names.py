"""enrolment tokens: the DNS names a service principal's certificate carries

A key server (keyless TLS) presents its enrolment certificate to edges as a TLS
server certificate; the operator may ask, when making the token, for DNS names
to go into its subjectAltName. The certificate takes them from the token, never
from the CSR.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrolment_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dns_names", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrolment_tokens", schema=None) as batch_op:
        batch_op.drop_column("dns_names")
