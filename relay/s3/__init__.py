"""The S3 protocol client of the shared media tier (``media.store``): aiobotocore, nothing else."""
