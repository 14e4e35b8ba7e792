//! Library target of mesh-ebpf, so mesh-daemon can declare a build-dependency on it and be rebuilt
//! when the kernel programs change (the aya-template arrangement). The programs are in `main.rs`.
#![no_std]
