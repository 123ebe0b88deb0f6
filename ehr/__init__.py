"""EHR side: MEDS reading, task selection, study labels, time-to-event head and loss, survival metrics."""
