//! The Obsrv Connectors operator: reconciles each `Connector` into a ConfigMap, Deployment, Service
//! and PodDisruptionBudget, scales it, and reports health and lag from the pods' `/status`.
//!
//! Reconcile is a pipeline: [`validate`] (pure) → [`builders`] (pure) → apply → [`observe`] →
//! [`status`] (pure) → write when changed. [`scaling`] and [`cleanup`] decide, also purely.

pub mod admin;
pub mod budget;
pub mod builders;
pub mod cleanup;
pub mod config;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod rbac;
pub mod reconcile;
pub mod run;
pub mod scaling;
pub mod status;
pub mod telemetry;
pub mod totals;
pub mod unreadable;
pub mod validate;
