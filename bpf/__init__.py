"""BPF C sources, shipped inside the tcptrace package as tcptrace.bpf."""
