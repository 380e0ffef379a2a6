//! `tunnelmesh up`: one config file (or flags alone), static or coordinated, with command-line
//! flags over the file's values; SIGHUP reloads the file.

use std::{
    io::BufRead,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    identity::{DEFAULT_IDENTITY, Identity},
    nat::portmap,
    node::{
        client::{self, JoinOptions},
        config::{Config, CoordinatorConfig, Mode},
        interface::{self, Interface},
    },
};

/// Default directory of a coordinated node's cached state (one folder per interface), when
/// systemd gives no `$STATE_DIRECTORY`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tunnelmesh";
/// Name of the identity credential a unit hands over with `LoadCredential=identity:…`.
pub const IDENTITY_CREDENTIAL: &str = "identity";

/// Command-line values that win over the file's (each `None`/`false` leaves the file's value).
#[derive(Default, Clone)]
pub struct Overrides {
    pub interface: Option<String>,
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    pub workers: Option<usize>,
    pub no_ebpf: bool,
    pub no_offload: bool,
    pub identity: Option<PathBuf>,
    pub coordinator: Option<String>,
    pub fingerprint: Option<String>,
    pub token_file: Option<PathBuf>,
    pub name: Option<String>,
    pub ssh_port: Option<u16>,
    pub port_mapping: Option<portmap::Mode>,
    pub port_mapping_lifetime: Option<u64>,
    pub state_dir: Option<PathBuf>,
}

impl Overrides {
    /// The file at `path` (or, without one, a coordinated config from `--coordinator` and
    /// `--fingerprint`), with these values over it.
    pub fn load(&self, path: Option<&Path>) -> Result<Config> {
        let mut config = match path {
            Some(path) => Config::load(path)?,
            None => {
                let (Some(url), Some(fingerprint)) = (&self.coordinator, &self.fingerprint) else {
                    bail!("give --config FILE, or --coordinator URL with --fingerprint SHA256:…");
                };
                Config::coordinated(CoordinatorConfig::new(url.clone(), fingerprint.clone()))
            }
        };
        self.apply(&mut config, path)?;
        Ok(config)
    }

    fn apply(&self, config: &mut Config, path: Option<&Path>) -> Result<()> {
        let i = &mut config.interface;
        set(&mut i.name, &self.interface);
        set(&mut i.listen_port, &self.listen_port);
        if let Some(mtu) = self.mtu {
            i.mtu = toml::Spanned::new(0..0, mtu);
        }
        set(&mut i.workers, &self.workers);
        i.no_ebpf |= self.no_ebpf;
        i.no_offload |= self.no_offload;
        match &mut config.mode {
            Mode::Coordinated(c) => {
                set(&mut c.url, &self.coordinator);
                set(&mut c.fingerprint, &self.fingerprint);
                set_some(&mut c.token_file, &self.token_file);
                set_some(&mut c.name, &self.name);
                set_some(&mut c.ssh_port, &self.ssh_port);
                set(&mut c.port_mapping, &self.port_mapping);
                set(&mut c.port_mapping_lifetime, &self.port_mapping_lifetime);
                set_some(&mut c.state_dir, &self.state_dir);
                if config.interface.listen_port == 0 {
                    bail!("--listen-port must be 1-65535: peers are told the port");
                }
            }
            Mode::Static(_) => {
                let coordinated = [
                    ("--coordinator", self.coordinator.is_some()),
                    ("--fingerprint", self.fingerprint.is_some()),
                    ("--token-file", self.token_file.is_some()),
                    ("--name", self.name.is_some()),
                    ("--ssh-port", self.ssh_port.is_some()),
                    ("--port-mapping", self.port_mapping.is_some()),
                    ("--port-mapping-lifetime", self.port_mapping_lifetime.is_some()),
                    ("--state-dir", self.state_dir.is_some()),
                ];
                let given: Vec<&str> = coordinated.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect();
                if !given.is_empty() {
                    bail!(
                        "{} lists its peers (a static mesh), so {} cannot apply; add a [coordinator] table to join a coordinator",
                        path.map_or("the config".into(), |p| p.display().to_string()),
                        given.join(", ")
                    );
                }
            }
        }
        Ok(())
    }
}

fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
    if let Some(v) = value {
        *slot = v.clone();
    }
}

fn set_some<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
    if value.is_some() {
        *slot = value.clone();
    }
}

/// `tunnelmesh up`: bring the interface up as `path` (and the flags) describe, and run it until
/// SIGINT/SIGTERM. SIGHUP re-reads the file: what can change live does, what cannot is named and
/// nothing is applied.
pub fn up(path: Option<&Path>, overrides: Overrides) -> Result<()> {
    let config = overrides.load(path)?;
    let credentials = crate::service::directory("CREDENTIALS_DIRECTORY");
    let identity = Identity::load(&identity_path(overrides.identity.as_deref(), credentials, &config))?;
    let mut current = config.clone();
    let reload = move |iface: &Interface| -> Result<()> {
        let Some(file) = path else {
            bail!("no --config file: nothing to reload");
        };
        let new = overrides.load(Some(file))?;
        let restart = current.restart_needed(&new);
        if !restart.is_empty() {
            bail!(
                "config {}: {} changed, which takes a restart (systemctl restart); nothing was applied",
                file.display(),
                restart.join(", ")
            );
        }
        if let (Mode::Static(old), Mode::Static(fresh)) = (&current.mode, &new.mode) {
            interface::reload_static(iface, old, fresh, file)?;
        }
        current = new;
        Ok(())
    };
    match &config.mode {
        Mode::Static(mesh) => interface::up_static(&config, mesh, path, identity, reload),
        Mode::Coordinated(c) => client::up(join_options(&config, c)?, identity, reload),
    }
}

/// `--identity`, else the unit's credential (`CREDENTIALS_DIRECTORY/identity`), else the file's
/// `identity`, else the host's SSH key.
fn identity_path(flag: Option<&Path>, credentials: Option<PathBuf>, config: &Config) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(dir) = credentials {
        let credential = dir.join(IDENTITY_CREDENTIAL);
        if credential.exists() {
            return credential;
        }
    }
    config
        .interface
        .identity
        .clone()
        .unwrap_or_else(|| DEFAULT_IDENTITY.into())
}

fn join_options(config: &Config, c: &CoordinatorConfig) -> Result<JoinOptions> {
    let i = &config.interface;
    let cache = match (&c.state_dir, crate::service::directory("STATE_DIRECTORY")) {
        (Some(dir), _) => dir.join(&i.name).join("state.json"),
        // systemd's per-instance directory.
        (None, Some(dir)) => dir.join("state.json"),
        (None, None) => Path::new(DEFAULT_STATE_DIR).join(&i.name).join("state.json"),
    };
    Ok(JoinOptions {
        url: c.url.clone(),
        fingerprint: c.fingerprint.clone(),
        token: c.token_file.as_deref().map(read_token).transpose()?,
        name: c.name.clone(),
        interface: i.name.clone(),
        listen_port: i.listen_port,
        mtu: config.mtu() as usize,
        workers: i.workers,
        cache,
        xdp_interfaces: i.xdp_interfaces.clone(),
        shield_hook: i.shield_hook,
        no_ebpf: i.no_ebpf,
        no_offload: i.no_offload,
        ssh_port: c.ssh_port.unwrap_or(i.listen_port),
        port_mapping: c.port_mapping,
        port_mapping_lifetime: Duration::from_secs(c.port_mapping_lifetime),
        metrics_listen: i.metrics_listen,
    })
}

/// The enrollment token from `path` (`-`: the first line of stdin). A file others may read is
/// refused: the token admits whoever holds it.
pub fn read_token(path: &Path) -> Result<String> {
    let text = if path == Path::new("-") {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the token from stdin")?;
        line
    } else {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read the token file {}; check the path", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "the token file {} has mode {mode:04o}, so other users may read the token; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?
    };
    let token = text.trim();
    if token.is_empty() {
        bail!(
            "the token file {} is empty; put the token `tunnelmesh coordinator token create` printed in it",
            path.display()
        );
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHIharsaew3kq9pJB0LJAOc0Sg5CPOkGdMBJ2l7MEmRG peer@test";
    const PSK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn flags_win_over_the_file_and_coordinator_flags_are_refused_on_a_static_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tm0.toml");
        std::fs::write(
            &path,
            "[interface]\nname = \"tm0\"\nlisten_port = 5000\n\n[coordinator]\nurl = \"https://c:8443\"\nfingerprint = \"SHA256:x\"\nname = \"alpha\"\n",
        )
        .unwrap();
        let o = Overrides {
            listen_port: Some(6000),
            name: Some("beta".into()),
            ..Default::default()
        };
        let c = o.load(Some(&path)).unwrap();
        assert_eq!((c.interface.name.as_str(), c.interface.listen_port), ("tm0", 6000));
        let Mode::Coordinated(coordinator) = &c.mode else {
            panic!("coordinated")
        };
        assert_eq!(coordinator.name.as_deref(), Some("beta"));
        assert_eq!(coordinator.url, "https://c:8443");

        std::fs::write(
            &path,
            format!(
                "[interface]\nmesh_key = \"{PSK}\"\naddresses = [\"10.99.0.1/24\"]\n[[peer]]\npublic_key = \"{KEY}\"\nallowed_ips = [\"10.99.0.2/32\"]\n"
            ),
        )
        .unwrap();
        let e = o.load(Some(&path)).err().unwrap().to_string();
        assert!(e.contains("--name") && e.contains("static mesh"), "{e}");
        let e = Overrides::default().load(None).err().unwrap().to_string();
        assert!(e.contains("--config FILE"), "{e}");
    }

    #[test]
    fn the_identity_is_the_flag_then_the_units_credential_then_the_files_then_the_host_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::coordinated(CoordinatorConfig::new("https://c".into(), "SHA256:x".into()));
        let creds = Some(dir.path().to_path_buf());
        assert_eq!(
            identity_path(None, creds.clone(), &config),
            Path::new(DEFAULT_IDENTITY),
            "no credential file"
        );
        config.interface.identity = Some("/etc/tunnelmesh/key".into());
        assert_eq!(
            identity_path(None, creds.clone(), &config),
            Path::new("/etc/tunnelmesh/key")
        );
        std::fs::write(dir.path().join(IDENTITY_CREDENTIAL), "key").unwrap();
        assert_eq!(identity_path(None, creds.clone(), &config), dir.path().join("identity"));
        assert_eq!(identity_path(Some(Path::new("/k")), creds, &config), Path::new("/k"));
    }

    #[test]
    fn a_token_file_others_can_read_or_an_empty_one_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "tmtok_abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&path).err().unwrap().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "tmtok_abc");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_token(&path).err().unwrap().to_string().contains("is empty"));
        let e = read_token(&dir.path().join("missing")).err().unwrap().to_string();
        assert!(e.contains("check the path"), "{e}");
    }
}
