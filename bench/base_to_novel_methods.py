"""Former entry point of the GLAD and mask-tuning runs on the base-to-novel harness; the methods now live in
`bench.base_to_novel` (run through `GLADTrainer` and `MaskTuningTrainer`). Kept so that recorded commands still run:

    python -m bench.base_to_novel_methods ...   # same as: python -m bench.base_to_novel ...
"""

from bench.base_to_novel import main


if __name__ == "__main__":
    main()
