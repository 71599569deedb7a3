-- One PostgreSQL for the team stack: a database each for Prefect, MLflow and the
-- service's inference log and feedback, and Label Studio.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE flywheel;
CREATE DATABASE labelstudio;
