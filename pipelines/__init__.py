"""Spark ETL: ingest raw files, quarantine bad records, split, normalize, write Parquet for training."""
