"""Ray pipelines: ``train_all`` fans training out per category; ``score`` streams archives into Parquet.

No model math lives here: the stages call :mod:`uflow_batch.model` and
:mod:`uflow_batch.train`, and move bytes through :mod:`uflow_batch.storage`.
"""
