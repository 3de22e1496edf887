print("host-bench")
