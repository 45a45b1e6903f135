"""The loader: BPF objects into the kernel, maps filled, programs run or attached.

It knows nothing of iptables: it takes compiled objects and the metadata codegen produced.
"""
