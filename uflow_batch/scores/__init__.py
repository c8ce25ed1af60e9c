"""The scores dataset: the Parquet table every scoring run adds to and analysts, dashboards and the report read.

Its shape is the product's public contract, so it has one home, one module per
concern: ``schema`` (the columns and their types), ``layout`` (where part
files lie and what they are called), ``dataset`` (how to open and read it) and
``retention`` (which nights to delete). The pipeline writes through these
modules and every reader opens the dataset through them, so a change to the
contract is made once and reaches writers and readers together.
"""
