"""Database: SQLAlchemy models, migrations and session helpers."""
