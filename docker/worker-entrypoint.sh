#!/bin/sh
# Entrypoint of the agreelens worker image (Dockerfile, target worker), run in /app:
#   pipeline [args]   python flows/pipeline.py [args]     (the Prefect flows)
#   repro [args]      dvc repro [args]
#   dvc ... | agreelens ... | python ... | sh ...  run as given
#   anything else     agreelens <args>  (e.g. `--help`, `data`, `report`)
set -e
case "${1:-}" in
  pipeline) shift; exec python flows/pipeline.py "$@" ;;
  repro) shift; exec dvc repro "$@" ;;
  dvc|agreelens|python|python3|sh|bash|prefect|mlflow) exec "$@" ;;
  *) exec agreelens "$@" ;;
esac
