"""The paper's case suites: ``ct_sparse`` (Fig. 2 right), ``ablation`` (Fig. 2 left),
``restoration`` (Figs. 4-5); ``common`` holds the shared data preparation and execution,
``tuning`` the validation-split hyper-parameter search."""
