"""CT volumes: reading, canonical preprocessing, the prepared cache, crops, datasets, demo cohort."""
