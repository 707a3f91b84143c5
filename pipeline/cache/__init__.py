"""The feature cache: the plan of a run (dataset, extractor, key), extraction, the HDF5 store."""
