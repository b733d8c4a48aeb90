"""Ray Tune sweeps over dumo-ray configs (`dumo-ray tune`); named search spaces live in `tune/spaces/`."""
