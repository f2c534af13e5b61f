//! The state a Xen domain carries besides its memory.

use migrate_core::{BackendError, BackendErrorKind, DeviceState};

/// The [`DeviceState::format`] of a Xen HVM/PVH domain's state.
pub(crate) const FORMAT: &str = "xen-hvm";
/// The version of that format this crate writes and reads.
pub(crate) const VERSION: u32 = 1;

/// A Xen HVM or PVH domain's vCPU and platform state: the hypervisor's
/// context record (`xc_domain_hvm_getcontext`: every vCPU's registers,
/// the local APICs, the interrupt controllers and timers, in Xen's own
/// save format) and the HVM parameters that travel with it.
///
/// Encoded as: the context's length (u32, little-endian) and bytes, then
/// the number of parameters (u32) and each as an index (u32) and a value
/// (u64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenDeviceState {
    /// Xen's context record.
    pub context: Vec<u8>,
    /// HVM parameters, by index.
    pub params: Vec<(u32, u64)>,
}

fn bad(why: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::IncompatibleState, why)
}

impl XenDeviceState {
    /// Encodes it for the wire.
    pub fn to_device_state(&self) -> DeviceState {
        let mut data = Vec::with_capacity(8 + self.context.len() + 12 * self.params.len());
        data.extend_from_slice(&(self.context.len() as u32).to_le_bytes());
        data.extend_from_slice(&self.context);
        data.extend_from_slice(&(self.params.len() as u32).to_le_bytes());
        for (p, v) in &self.params {
            data.extend_from_slice(&p.to_le_bytes());
            data.extend_from_slice(&v.to_le_bytes());
        }
        DeviceState {
            format: FORMAT.into(),
            version: VERSION,
            data,
        }
    }

    /// Decodes what [`XenDeviceState::to_device_state`] wrote; another
    /// format or version, or a truncated or oversized record, is an
    /// `IncompatibleState` error.
    pub fn from_device_state(s: &DeviceState) -> Result<Self, BackendError> {
        if s.format != FORMAT || s.version != VERSION {
            return Err(bad(format!(
                "state is {} version {}; this backend reads {FORMAT} version {VERSION}",
                s.format, s.version
            )));
        }
        let mut r = Reader(&s.data);
        let n = r.u32()? as usize;
        let context = r.take(n)?.to_vec();
        let count = r.u32()? as usize;
        if count > r.0.len() / 12 {
            return Err(bad(format!("state claims {count} parameters, holds fewer")));
        }
        let mut params = Vec::with_capacity(count);
        for _ in 0..count {
            params.push((r.u32()?, r.u64()?));
        }
        if !r.0.is_empty() {
            return Err(bad(format!("{} bytes after the state", r.0.len())));
        }
        Ok(XenDeviceState { context, params })
    }
}

pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], BackendError> {
        if self.0.len() < n {
            return Err(bad(format!(
                "state truncated: {n} bytes wanted, {} left",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, BackendError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, BackendError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let s = XenDeviceState {
            context: (0..200u8).collect(),
            params: vec![(1, 0xfeffc), (2, 1), (10, 0)],
        };
        let d = s.to_device_state();
        assert_eq!(XenDeviceState::from_device_state(&d).unwrap(), s);
        for cut in 0..d.data.len() {
            let mut t = d.clone();
            t.data.truncate(cut);
            let e = XenDeviceState::from_device_state(&t).unwrap_err();
            assert_eq!(e.kind, BackendErrorKind::IncompatibleState);
        }
        let mut longer = d.clone();
        longer.data.push(0);
        assert!(XenDeviceState::from_device_state(&longer).is_err());
        let mut lying = d.clone();
        lying.data[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(XenDeviceState::from_device_state(&lying).is_err());
        let other = DeviceState {
            format: "kvm".into(),
            ..d
        };
        assert!(XenDeviceState::from_device_state(&other).is_err());
    }
}
