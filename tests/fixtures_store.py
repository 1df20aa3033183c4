"""Store fixtures: SQLite in a temp folder, and PostgreSQL on 127.0.0.1:5432 when it answers."""
