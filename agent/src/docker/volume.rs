//! Named volumes (an app's static files, for instance).

use super::{Docker, DockerError};

impl Docker {
    /// Removes a named volume; one that is already gone counts as removed.
    pub async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
        match self
            .api
            .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::engine(format!("remove volume {name}"))(e)),
        }
    }
}
