-- Run once by the postgres image, on the first start with an empty data volume
-- (/docker-entrypoint-initdb.d/), as POSTGRES_USER, which then owns both databases:
--   optuna  the Optuna storage every worker and the dashboard share (SEARCH_STORAGE)
--   mlflow  the MLflow tracking server's backend store
-- Changing this file later does nothing to an existing volume; create a database by hand then:
--   docker compose exec postgres createdb -U search NAME
CREATE DATABASE optuna;
CREATE DATABASE mlflow;
