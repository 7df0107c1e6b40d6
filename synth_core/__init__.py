"""synth_core: the SCoder factory's library (models, the stages' math, storage). It never imports Prefect."""
