-- Run once by the postgres container on an empty volume: MLflow's store lives beside Prefect's.
CREATE DATABASE mlflow;
