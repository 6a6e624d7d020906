"""Traces: workload traces, a replayer and a discrete-event simulator."""
