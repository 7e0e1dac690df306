//! Generated protocol code (tonic + prost). Handlers convert between these
//! types and the domain types; no domain logic lives here.

/// `tripod.buildd.v1`: the builder sidecar's API.
pub mod buildd {
    /// Version 1.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("tripod.buildd.v1");
    }
}

/// `tripod.executor.v1`: the controller's API for executors.
pub mod executor {
    /// Version 1.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("tripod.executor.v1");
    }
}
