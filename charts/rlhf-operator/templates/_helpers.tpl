{{/* Names, labels and small computed values shared by every template. */}}

{{- define "rlhf-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name; the release name alone when it already contains the chart name. */}}
{{- define "rlhf-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlhf-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rlhf-operator.labels" -}}
helm.sh/chart: {{ include "rlhf-operator.chart" . }}
{{ include "rlhf-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-platform
{{- end }}

{{- define "rlhf-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: set the name of an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest]; the tag defaults to the chart's appVersion. */}}
{{- define "rlhf-operator.imageRef" -}}
{{- $ref := printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- if .image.digest }}
{{- $ref = printf "%s@%s" .image.repository .image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{- define "rlhf-operator.image" -}}
{{- include "rlhf-operator.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "rlhf-operator.trainerImage" -}}
{{- include "rlhf-operator.imageRef" (dict "image" .Values.trainer.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "rlhf-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "rlhf-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "rlhf-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the ValidatingWebhookConfiguration the operator (kopf) creates and keeps up to date. */}}
{{- define "rlhf-operator.webhookConfigName" -}}
{{- printf "%s.%s.rlhf.io" (include "rlhf-operator.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Namespaced mode: the operator watches only the listed namespaces and gets Roles there. */}}
{{- define "rlhf-operator.namespaced" -}}
{{- if .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/* The operator's settings (rlhf_operator/settings.py reads them), as a container env list. */}}
{{- define "rlhf-operator.settingsEnv" -}}
- name: RLHF_TRAINER_IMAGE
  value: {{ include "rlhf-operator.trainerImage" . | quote }}
- name: RLHF_TRAINER_METRICS_PORT
  value: {{ .Values.trainer.metricsPort | quote }}
- name: RLHF_TRAINER_SECURITY_CONTEXT
  value: {{ dict "pod" .Values.trainer.podSecurityContext "container" .Values.trainer.securityContext | toJson | quote }}
- name: RLHF_ALLOWED_TRAINER_IMAGES
  value: {{ join "," .Values.trainer.allowedImages | quote }}
- name: RLHF_ALLOW_SECRET_ENV
  value: {{ .Values.trainer.allowSecretEnv | quote }}
- name: RLHF_ALLOWED_ENV
  value: {{ join "," .Values.trainer.allowedEnv | quote }}
- name: RLHF_ALLOWED_PRIORITY_CLASSES
  value: {{ join "," .Values.trainer.allowedPriorityClasses | quote }}
- name: RLHF_ALLOWED_TOLERATION_KEYS
  value: {{ join "," .Values.trainer.allowedTolerationKeys | quote }}
- name: RLHF_WATCH_NAMESPACES
  value: {{ join "," .Values.operator.watchNamespaces | quote }}
- name: RLHF_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: RLHF_HEALTH_PORT
  value: {{ .Values.operator.healthPort | quote }}
- name: RLHF_RESYNC_SECONDS
  value: {{ .Values.operator.resyncSeconds | quote }}
- name: RLHF_MAX_GPUS_PER_POD
  value: {{ .Values.operator.maxGpusPerPod | quote }}
- name: RLHF_RESTART_BACKOFF_SECONDS
  value: {{ .Values.operator.restartBackoffSeconds | quote }}
- name: RLHF_LOG_LEVEL
  value: {{ .Values.operator.logLevel | quote }}
- name: RLHF_CHECKPOINT_STORAGE_CLASS
  value: {{ .Values.operator.checkpoint.storageClass | quote }}
- name: RLHF_CHECKPOINT_SIZE
  value: {{ .Values.operator.checkpoint.size | quote }}
- name: RLHF_WEBHOOK_ENABLED
  value: {{ .Values.webhook.enabled | quote }}
{{- if .Values.webhook.enabled }}
- name: RLHF_WEBHOOK_PORT
  value: {{ .Values.webhook.port | quote }}
# The API server reaches the webhook through the Service; the operator names it in the configuration.
- name: RLHF_WEBHOOK_SERVICE
  value: {{ printf "%s.%s" (include "rlhf-operator.webhookServiceName" .) .Release.Namespace | quote }}
- name: RLHF_WEBHOOK_HOST
  value: {{ printf "%s.%s.svc" (include "rlhf-operator.webhookServiceName" .) .Release.Namespace | quote }}
- name: RLHF_WEBHOOK_CONFIG_NAME
  value: {{ include "rlhf-operator.webhookConfigName" . | quote }}
- name: RLHF_WEBHOOK_FAILURE_POLICY
  value: {{ .Values.webhook.failurePolicy | quote }}
{{- if .Values.webhook.tls.secretName }}
- name: RLHF_WEBHOOK_CERT_FILE
  value: /etc/rlhf-webhook/tls.crt
- name: RLHF_WEBHOOK_KEY_FILE
  value: /etc/rlhf-webhook/tls.key
- name: RLHF_WEBHOOK_CA_FILE
  value: /etc/rlhf-webhook/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/*
RBAC rules. Each verb is there for a reason given next to it; the test suite checks that these equal
the rules the operator declares it needs and runs the operator with exactly these permissions.
Rules on namespaced resources: in a ClusterRole (all namespaces) or a Role per watched namespace.
*/}}
{{- define "rlhf-operator.namespacedRules" -}}
# The four job kinds. get: each reconcile reads the job; list/watch: kopf follows and indexes them
# (a job's dependencies are looked up there); delete: ttlSecondsAfterFinished. No patch or update:
# the operator keeps no finalizers or annotations on jobs.
- apiGroups: [rlhf.io]
  resources: [sftjobs, rewardmodeljobs, ppojobs, dpojobs]
  verbs: [get, list, watch, delete]
# Conditions, phase and progress are written through the status subresource (patch only).
- apiGroups: [rlhf.io]
  resources: [sftjobs/status, rewardmodeljobs/status, ppojobs/status, dpojobs/status]
  verbs: [patch]
# update on finalizers: children name their job in an ownerReference with blockOwnerDeletion, which
# clusters with the OwnerReferencesPermissionEnforcement admission plugin allow only with this right.
- apiGroups: [rlhf.io]
  resources: [sftjobs/finalizers, rewardmodeljobs/finalizers, ppojobs/finalizers, dpojobs/finalizers]
  verbs: [update]
# Trainer pods. create: one per attempt (one per rank for a multi-node job); list/watch: kopf indexes
# them (status comes from them); get: a pod just created may not be indexed yet; delete: suspend,
# deadlines, replacing a failed pod; patch: lift a multi-node job's scheduling gate from all its pods.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
# A multi-node job's headless Service (its pods' DNS names). create; get: check whose an existing one is.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# Checkpoint claims. create: one per job; list/watch: kopf indexes them (a claim being deleted fails
# its job and the jobs reading it); get: one the index has not seen yet, or found under the job's
# claim name, to check that the job created it (never adopted otherwise); patch: its ownerReference
# is added or removed when checkpoint.retainPolicy changes (deleted with the job, or kept).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch]
# The job's rendered trainer config (mounted at /etc/rlhf). create; get and patch: bring an existing
# one up to date when a suspended job's spec changed.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# Events on every job transition. create only: nothing reads them back.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Rules on cluster-scoped resources: always in a ClusterRole. */}}
{{- define "rlhf-operator.clusterRules" -}}
# kopf discovers the CRDs it serves (get/list) and, with watch, notices a later (re)install. Read-only.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
{{- if include "rlhf-operator.namespaced" . }}
# Namespaced mode only: kopf follows the watched namespaces appearing and disappearing with list and
# watch on namespaces (names only; nothing inside them).
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- if .Values.webhook.enabled }}
# kopf creates its webhook configurations, a validating one and an (empty) mutating one, under one
# name (create cannot be limited by name) ...
- apiGroups: [admissionregistration.k8s.io]
  resources: [validatingwebhookconfigurations, mutatingwebhookconfigurations]
  verbs: [create]
# ... and patch keeps their webhooks and CA bundle up to date, in those named objects only.
- apiGroups: [admissionregistration.k8s.io]
  resources: [validatingwebhookconfigurations, mutatingwebhookconfigurations]
  resourceNames: [{{ include "rlhf-operator.webhookConfigName" . }}]
  verbs: [patch]
{{- end }}
{{- end }}

{{/* Labels the operator puts on every trainer pod (rlhf_operator/builders.py); the PodMonitor selects on them. */}}
{{- define "rlhf-operator.trainerPodSelector" -}}
app.kubernetes.io/managed-by: rlhf-operator
app.kubernetes.io/name: rlhf-trainer
{{- end }}

{{/* The trainer pods' namespaces as a prometheus-operator namespaceSelector. */}}
{{- define "rlhf-operator.trainerNamespaceSelector" -}}
{{- if .Values.operator.watchNamespaces -}}
matchNames:
  {{- toYaml .Values.operator.watchNamespaces | nindent 2 }}
{{- else -}}
any: true
{{- end }}
{{- end }}
