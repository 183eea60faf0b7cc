"""``python -m taps_peft train ...`` (and ``accelerate launch -m taps_peft train ...``): see ``taps-peft train -h``."""

from .training.cli import main

main()
