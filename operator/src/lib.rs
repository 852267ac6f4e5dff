//! The Obsrv Connectors operator: reconciles each `Connector` into a ConfigMap, Deployment, Service
//! and PodDisruptionBudget, scales it, and reports health and lag from the pods' `/status`.
//!
//! Reconcile is a pipeline: [`validate`] (pure) → [`builders`] (pure) → apply → [`observe`] →
//! [`status`] (pure) → write when changed. [`scaling`] decides replicas, also purely.

pub mod builders;
pub mod config;
pub mod rbac;
pub mod validate;
