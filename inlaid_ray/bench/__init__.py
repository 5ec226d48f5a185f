"""Evaluation and benchmarking, run by people and CI, never by serving: the scheduling simulator
and its workloads and metrics, the HTTP load generator and its statistics and report, and the
step-cost measurement whose JSON the replicas' policies read (`inlaid-ray bench ...`)."""
