"""``python -m wsss_dist key=value ...`` (also under ``accelerate launch -m wsss_dist``)."""
from .cli import main

if __name__ == "__main__":
    main()
