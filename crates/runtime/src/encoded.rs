//! Pre-encoded list entries. ListContainers and ListPodSandbox answer with protobuf bytes
//! assembled from each entry's encoding, made once per container or pod: everything in a
//! list entry but its state is fixed at creation, so a list call only copies bytes and
//! writes the state, instead of cloning and encoding every label and annotation again.
//!
//! The assembled bytes are exactly what prost writes for the same message (fields in tag
//! order, the state omitted when it is 0), so any client decodes them as usual.

use std::marker::PhantomData;

use k8s_cri::v1::{ListContainersResponse, ListPodSandboxResponse};
use prost::Message;

/// Protobuf wire type of varints (the state enum).
const WIRE_VARINT: u64 = 0;
/// Protobuf wire type of length-delimited fields (the entries).
const WIRE_LEN: u64 = 2;

/// Where entries and their state sit in a list response.
pub trait ListLayout {
    /// Tag of the repeated entry field in the response.
    const ENTRIES: u32;
    /// Tag of the state enum in each entry.
    const STATE: u32;
}

impl ListLayout for ListContainersResponse {
    const ENTRIES: u32 = 1; // containers
    const STATE: u32 = 6; // Container.state
}

impl ListLayout for ListPodSandboxResponse {
    const ENTRIES: u32 = 1; // items
    const STATE: u32 = 3; // PodSandbox.state
}

/// One entry's encoding without its state: the fields whose tags are below the state's,
/// then those above it.
#[derive(Debug)]
pub(crate) struct Prefab {
    bytes: Box<[u8]>,
    split: usize,
}

impl Prefab {
    /// From the entry's fields before the state (`head`) and after it (`tail`), each as a
    /// message of the entry's type with the other fields left empty.
    pub(crate) fn new(head: &impl Message, tail: &impl Message) -> Self {
        let mut bytes = head.encode_to_vec();
        let split = bytes.len();
        bytes.extend_from_slice(&tail.encode_to_vec());
        Self { bytes: bytes.into_boxed_slice(), split }
    }
}

fn put_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(value: u64) -> usize {
    // 7 bits a byte; 0 takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// A list response `T` (`ListContainersResponse`, `ListPodSandboxResponse`) in protobuf
/// encoding, ready to send as a gRPC message.
pub struct Encoded<T> {
    bytes: Vec<u8>,
    count: usize,
    _message: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("bytes", &self.bytes.len())
            .field("count", &self.count)
            .finish()
    }
}

impl<T: ListLayout + Message + Default> Encoded<T> {
    /// An empty list with room for `bytes` bytes.
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self { bytes: Vec::with_capacity(bytes), count: 0, _message: PhantomData }
    }

    /// The list of `entries`, each with its state (the CRI enum value), in one allocation.
    pub(crate) fn from_entries(entries: &[(&Prefab, i32)]) -> Self {
        // Per entry at most: key and length (1 + 5 bytes), state key and value (5 + 10).
        let size = entries.iter().map(|(p, _)| p.bytes.len() + 21).sum();
        let mut list = Self::with_capacity(size);
        for (prefab, state) in entries {
            list.push(prefab, *state);
        }
        list
    }

    /// Appends an entry in `state` (the CRI enum value).
    pub(crate) fn push(&mut self, entry: &Prefab, state: i32) {
        // Enum values are encoded as int64 varints (negative ones take ten bytes).
        let state_value = state as i64 as u64;
        let state_len = if state == 0 {
            0
        } else {
            varint_len(u64::from(T::STATE) << 3) + varint_len(state_value)
        };
        let out = &mut self.bytes;
        put_varint(u64::from(T::ENTRIES) << 3 | WIRE_LEN, out);
        put_varint((entry.bytes.len() + state_len) as u64, out);
        out.extend_from_slice(&entry.bytes[..entry.split]);
        if state != 0 {
            put_varint(u64::from(T::STATE) << 3 | WIRE_VARINT, out);
            put_varint(state_value, out);
        }
        out.extend_from_slice(&entry.bytes[entry.split..]);
        self.count += 1;
    }

    /// The encoded message.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The message itself (for callers that want the structs; slower than sending bytes).
    pub fn decode(&self) -> Result<T, prost::DecodeError> {
        T::decode(self.bytes.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use k8s_cri::v1::{Container, ContainerMetadata, ImageSpec, PodSandbox, PodSandboxMetadata};

    use super::*;

    fn labels(n: usize) -> HashMap<String, String> {
        (0..n).map(|i| (format!("key{i}"), format!("value-{i}"))).collect()
    }

    fn container(id: &str, state: i32) -> Container {
        Container {
            id: id.into(),
            pod_sandbox_id: "pod".into(),
            metadata: Some(ContainerMetadata { name: "c".into(), attempt: 3 }),
            image: Some(ImageSpec { image: "busybox".into(), ..Default::default() }),
            image_ref: "sha256:abc".into(),
            state,
            created_at: 1_700_000_000_000_000_000,
            labels: labels(3),
            annotations: labels(200),
            image_id: "sha256:abc".into(),
        }
    }

    fn container_prefab(c: &Container) -> Prefab {
        let head = Container {
            id: c.id.clone(),
            pod_sandbox_id: c.pod_sandbox_id.clone(),
            metadata: c.metadata.clone(),
            image: c.image.clone(),
            image_ref: c.image_ref.clone(),
            ..Default::default()
        };
        let tail = Container {
            created_at: c.created_at,
            labels: c.labels.clone(),
            annotations: c.annotations.clone(),
            image_id: c.image_id.clone(),
            ..Default::default()
        };
        Prefab::new(&head, &tail)
    }

    #[test]
    fn containers_encode_as_prost_does() {
        // All states, including 0 (omitted) and an unknown negative value.
        let states = [0, 1, 2, 3, 200, -1];
        let containers: Vec<Container> =
            states.iter().enumerate().map(|(i, s)| container(&format!("c{i}"), *s)).collect();
        let mut encoded = Encoded::<ListContainersResponse>::with_capacity(0);
        for c in &containers {
            encoded.push(&container_prefab(c), c.state);
        }
        let expected = ListContainersResponse { containers: containers.clone() };
        assert_eq!(encoded.as_bytes(), expected.encode_to_vec().as_slice());
        assert_eq!(encoded.len(), states.len());
        assert_eq!(encoded.decode().unwrap(), expected);
    }

    #[test]
    fn sandboxes_encode_as_prost_does() {
        let pods: Vec<PodSandbox> = (0..3)
            .map(|i| PodSandbox {
                id: format!("p{i}"),
                metadata: Some(PodSandboxMetadata {
                    name: "n".into(),
                    uid: "u".into(),
                    namespace: "ns".into(),
                    attempt: 1,
                }),
                state: i,
                created_at: 42,
                labels: labels(2),
                annotations: labels(1),
                runtime_handler: "runc".into(),
            })
            .collect();
        let mut encoded = Encoded::<ListPodSandboxResponse>::with_capacity(0);
        for p in &pods {
            let head =
                PodSandbox { id: p.id.clone(), metadata: p.metadata.clone(), ..Default::default() };
            let tail = PodSandbox { state: 0, id: String::new(), metadata: None, ..p.clone() };
            encoded.push(&Prefab::new(&head, &tail), p.state);
        }
        let expected = ListPodSandboxResponse { items: pods };
        assert_eq!(encoded.as_bytes(), expected.encode_to_vec().as_slice());
    }

    #[test]
    fn empty_list_is_empty_message() {
        let encoded = Encoded::<ListContainersResponse>::with_capacity(0);
        assert!(encoded.is_empty());
        assert_eq!(encoded.decode().unwrap(), ListContainersResponse::default());
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut out = Vec::new();
            put_varint(v, &mut out);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
