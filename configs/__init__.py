"""The YAML configs shipped inside the package (installed as align.configs): embed/, train/, compare/, datasets/."""
