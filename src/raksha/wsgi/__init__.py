"""WSGI entry points for real servers (uwsgi, gunicorn, mod_wsgi)."""
