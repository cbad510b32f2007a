"""``python -m agreelens ...`` = the ``agreelens`` command (and what ``torchrun -m agreelens`` runs)."""

from agreelens.cli import main

if __name__ == "__main__":
    main()
