"""`python -m packing`: pack a dataset (packing/pack.py's command line)."""
from packing.pack import cli

if __name__ == "__main__":
    cli()
