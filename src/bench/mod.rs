//! `manta-bench`: latency of create / exec / destroy against a running server, and the
//! comparison of those figures with a baseline measured by hand (`bench/baseline.sh`).
//!
//! [`run`] drives the server and collects samples, [`stats`] reduces them to percentiles,
//! [`report`] is the JSON document both the bench and the baseline script write, and
//! [`compare`] reads such documents back and checks them against the targets.

pub mod args;
pub mod compare;
pub mod http;
pub mod report;
pub mod run;
pub mod stats;
