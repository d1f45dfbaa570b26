"""Jobs that build or measure artifacts: indexing (Ray Data), training (experts, add/remove),
pilots, ir (split rules, qrels, runs, metrics), beir_eval, qa_eval, classifier_router, reports.
The online app never imports this package."""
