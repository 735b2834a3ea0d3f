//! User-defined networks, where an app's containers find each other by name.

use std::collections::HashMap;

use bollard::models::NetworkCreateRequest;

use super::{Docker, DockerError};

impl Docker {
    /// Creates a bridge network with `labels`; returns its id.
    pub async fn create_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError> {
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            labels: Some(labels),
            ..Default::default()
        };
        let created = self
            .api
            .create_network(request)
            .await
            .map_err(DockerError::engine(format!("create network {name}")))?;
        Ok(created.id)
    }

    /// Removes a network; one that is already gone counts as removed.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.api.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::engine(format!("remove network {name}"))(e)),
        }
    }
}
