"""Where the routed experts of an MoE layer live and how they are computed.

formats.py    what each expert format stores: quantize / dequantize, the kernel's input rounding
stores.py     the one expert loop, and the stores that keep experts on the device
host.py       experts in host RAM (or memory-mapped, disk.py), computed by moe_cpu.c
kernel.py     moe_cpu.c, built on first use and called through ctypes
placement.py  --experts / --expert-bits: where they go, whether they fit, which store
decode.py     one decode step as GPU segments between the host round trips
report.py     expert bytes read per token against the host's read bandwidth
"""
