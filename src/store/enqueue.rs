//! The writer's `Enqueue` command: accepted events into pages, their first
//! attempts into schedule chunks (or entries of their own), idempotency
//! keys, and which lanes' ranges changed.

use std::collections::HashMap;

use uuid::Uuid;

use super::keys::{self, ScheduleKey};
use super::writer::Pending;
use super::{encode, Accepted, Scheduled, StoreError};
use crate::model::{DeviceOrder, EventRecord, ScheduledDelivery};

fn accepted(record: &EventRecord, duplicate: bool) -> Accepted {
    Accepted {
        id: record.id,
        deliveries: record
            .deliveries
            .iter()
            .map(|d| (d.partner.clone(), d.id))
            .collect(),
        duplicate,
        scheduled: Vec::new(),
    }
}

pub(super) fn enqueue(
    p: &mut Pending<'_>,
    events: Vec<EventRecord>,
) -> Result<Vec<Accepted>, StoreError> {
    // Look everything up first, so a failed read leaves nothing half-staged.
    let mut staged = Vec::with_capacity(events.len());
    let mut seen_in_request: HashMap<String, Accepted> = HashMap::new();
    for mut event in events {
        if let Some(key) = &event.idempotency_key {
            if let Some(first) = seen_in_request.get(key) {
                staged.push(Err(Accepted {
                    duplicate: true,
                    ..first.clone()
                }));
                continue;
            }
            if let Some(id) = p.get(&keys::idempotency(key))? {
                let id = Uuid::from_slice(&id).map_err(|e| StoreError::Corrupt {
                    key: format!("idempotency key {key:?}"),
                    reason: e.to_string(),
                })?;
                if let Some((first, _)) = p.event(id)? {
                    staged.push(Err(accepted(&first, true)));
                    continue;
                }
            }
        }
        event.id = p.pages.assign(p.new_id(event.received_ms));
        for d in &mut event.deliveries {
            d.id = p.new_id(event.received_ms);
        }
        if let Some(key) = &event.idempotency_key {
            seen_in_request.insert(key.clone(), accepted(&event, true));
        }
        staged.push(Ok(event));
    }
    let mut out = Vec::with_capacity(staged.len());
    for item in staged {
        let mut event = match item {
            Err(duplicate) => {
                out.push(duplicate);
                continue;
            }
            Ok(event) => event,
        };
        let mut answer = accepted(&event, false);
        for d in &mut event.deliveries {
            let due_ms = d.next_due_ms.unwrap_or(event.received_ms);
            if !d.ordered && d.coalesce.is_none() {
                // A chunk member's entry says it was enqueued when due.
                p.moved(&d.partner, event.priority, due_ms, 1);
                // A plain first attempt: one member of this group's chunk.
                let (key, chunk) = p
                    .chunks
                    .add(&d.partner, event.priority, due_ms, d.id, event.id);
                d.chunk = Some(chunk);
                answer.scheduled.push(Scheduled {
                    partner: key.partner,
                    priority: key.priority,
                    delivery: d.id,
                    event: event.id,
                });
                continue;
            }
            p.moved(&d.partner, event.priority, event.received_ms, 1);
            let key = ScheduleKey {
                partner: d.partner.clone(),
                priority: event.priority,
                due_ms,
                delivery: d.id,
            };
            let order = d.ordered.then(|| DeviceOrder {
                device: event.device_id.clone(),
                seq: p.seq(),
            });
            if let Some(o) = &order {
                p.put(
                    keys::device_queue(&d.partner, &o.device, o.seq, d.id),
                    Vec::new(),
                );
            }
            if let Some(state) = &d.coalesce {
                // Names the newest: an older one still waiting is superseded.
                let latest = keys::latest_state(&d.partner, &event.device_id, state);
                p.put(latest, d.id.as_bytes().to_vec());
            }
            let entry = ScheduledDelivery {
                delivery: d.id,
                event: event.id,
                attempts: 0,
                created_ms: event.received_ms,
                order,
                chunk: None,
            };
            p.put(key.encode(), encode(&entry));
            answer.scheduled.push(Scheduled {
                partner: key.partner,
                priority: key.priority,
                delivery: d.id,
                event: event.id,
            });
        }
        if let Some(key) = &event.idempotency_key {
            p.put(keys::idempotency(key), event.id.as_bytes().to_vec());
        }
        p.pages.add(&event);
        out.push(answer);
    }
    Ok(out)
}
