//! Reading a whole per-CPU hash map in few system calls (BPF_MAP_LOOKUP_BATCH).
