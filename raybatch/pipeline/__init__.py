"""The data plane, one module per stage in flow order:
read → validate → preprocess → engine → postprocess → write."""
