"""Evaluation: everything that turns a run folder's stored maps into numbers and pages.

run_folder (the paths inside a run folder), map_store (the maps on disk), metric_table (the one table of
metrics: names, headers, paper columns), metrics / array_metrics / class_scan / class_metrics / curves (the
two protocols, exact and streamed), thresholds, plots, visuals, run_results / galleries / report_page /
report (a run's results read back, the report page and its command line), run_inputs (what a run's maps
were made from) and evaluate (a run folder's metrics, curves, thresholds and scores). Nothing here imports
the scripts, training or the diffusion model; only :mod:`vlmdiff.scoring` (the pooling of a map into an
image score) comes from the method.
"""
