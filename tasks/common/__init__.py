"""The ground floor every stage stands on: records and readers, model loading, NLL kernels, generation,
hashing, the home folder and MLflow helpers. Nothing here imports a stage or `flows`."""
