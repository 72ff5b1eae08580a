"""`python -m finetune ...` is `finetune ...` (what torchrun launches: `torchrun ... -m finetune ...`)."""

from finetune.cli.main import train_main

if __name__ == "__main__":
    train_main()
