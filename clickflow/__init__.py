"""clickflow: ingest website clickstream data into analytic tables."""
