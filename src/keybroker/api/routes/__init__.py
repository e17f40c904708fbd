"""One router per resource; :func:`keybroker.api.app.create_app` mounts them all."""
