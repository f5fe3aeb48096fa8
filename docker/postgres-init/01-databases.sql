-- One Postgres for both servers: MLflow uses the default database (POSTGRES_DB), Prefect its own.
CREATE DATABASE prefect;
