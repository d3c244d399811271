//! Generated gRPC code of NeoX Serve, nothing else.

pub mod neox {
    pub mod v1 {
        tonic::include_proto!("neox.v1");
    }
    pub mod shard {
        pub mod v1 {
            tonic::include_proto!("neox.shard.v1");
        }
    }
}

/// Encoded `FileDescriptorSet` of every proto here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("neox_descriptor");
