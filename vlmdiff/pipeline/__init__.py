"""One command from images to a paper table: recipes, the plan of jobs, and the launchers that run it.

``recipe`` reads a run file of ``configs/recipes/`` (OmegaConf structured config); ``plan`` turns it into
jobs (the stage scripts' real command lines, resources, dependencies, completion checks); ``launchers``
runs the jobs on this machine or submits them to SLURM; ``compute`` estimates GPU-hours from counted FLOPs.
"""
