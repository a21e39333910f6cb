//! Slurm hostlist expansion (being written).
