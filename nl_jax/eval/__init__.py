"""nl_jax.eval: evaluation tasks on exported models (`python -m nl_jax.eval`, see cli.py).

Modules: decoding (greedy), forward (jitted logits), perplexity (ppl / bits per byte), niah
(RULER S-NIAH-1/2/3), mqar_recall (Zoology MQAR), babilong (bAbI qa1/qa2 in a haystack),
continual (task streams, R[i, j], BWT, forgetting) with continual_metrics and cms_updates,
lm_eval_adapter (lm-evaluation-harness), haystack, generation_task, scoring, heatmap
(matplotlib, else Pillow), table, cli.
"""
